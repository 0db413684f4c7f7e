//! Engine test helpers: a scripted OpenAI-compatible SSE server on 127.0.0.1 and an `ai-engine serve` process.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapce_ai_transport::Endpoint;
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
    task: tokio::task::JoinHandle<()>,
}

impl FakeOpenAi {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let aborted = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let (r, a, c) = (
            Arc::clone(&requests),
            Arc::clone(&aborted),
            Arc::clone(&completed),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let (r, a, c) = (Arc::clone(&r), Arc::clone(&a), Arc::clone(&c));
                tokio::spawn(async move {
                    let Some(path) = read_request(&mut socket).await else {
                        return;
                    };
                    r.fetch_add(1, Ordering::SeqCst);
                    let chat = path.contains("chat");
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        a.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    for piece in &script.pieces {
                        tokio::time::sleep(script.delay).await;
                        let text = serde_json::to_string(piece).unwrap();
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

/// Reads one HTTP request (headers + content-length body); returns its path.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
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
            return head.split_whitespace().nth(1).map(str::to_owned);
        }
    }
}

/// A private rendezvous root + endpoint + config directory for one test.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub endpoint: Endpoint,
}

impl Sandbox {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ai-engine-test")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let root = dir.path().join("run");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let endpoint = Endpoint::in_root(&format!("{name}-{}", std::process::id()), &root).unwrap();
        Self { dir, endpoint }
    }

    /// Writes an engine.toml (mode 0600) and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("engine.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// An `ai-engine` command with this sandbox's rendezvous root, endpoint and XDG dirs.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ai-engine"));
        command
            .env("LAPCE_AI_RUNTIME_DIR", self.endpoint.root())
            .env("LAPCE_AI_ENDPOINT", self.endpoint.name())
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"));
        command
    }

    /// Starts `ai-engine serve --config FILE` and waits until it serves.
    pub fn serve(&self, config: &Path) -> Engine {
        let child = self
            .command()
            .arg("--config")
            .arg(config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        lapce_ai_transport::wait_for_engine(&self.endpoint, Duration::from_secs(20))
            .expect("engine did not start");
        Engine { child }
    }

    /// Nothing of this endpoint is left in /dev/shm or the rendezvous directory.
    pub fn assert_clean(&self) {
        let prefix = self.endpoint.shm_prefix();
        let leaked: Vec<String> = std::fs::read_dir("/dev/shm")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(leaked.is_empty(), "shared memory left behind: {leaked:?}");
        let files: Vec<_> = walk(self.endpoint.dir());
        assert!(
            files.is_empty(),
            "files left in the rendezvous dir: {files:?}"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A running engine process, killed on drop if still alive.
pub struct Engine {
    pub child: Child,
}

impl Engine {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait: the engine shuts down gracefully.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config whose completion and chat profiles use the fake server.
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
