//! A small LSP client that drives the real `lapce-ai-lsp` binary the way Lapce does.
#![allow(dead_code)]

use std::{
    io::{BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// The capabilities Lapce (0.4.x) sends, reduced to the parts that matter here.
pub fn lapce_client_capabilities() -> Value {
    json!({
        "textDocument": {
            "synchronization": { "didSave": true, "dynamicRegistration": true },
            "completion": { "completionItem": { "snippetSupport": true,
                "resolveSupport": { "properties": ["additionalTextEdits"] } } },
            "hover": { "contentFormat": ["markdown", "plaintext"] },
            "inlineCompletion": {},
            "publishDiagnostics": {},
        },
        "window": { "workDoneProgress": true,
            "showMessage": { "messageActionItem": { "additionalPropertiesSupport": true } } },
        "workspace": { "configuration": false, "workspaceFolders": true, "symbol": {} },
        "experimental": { "serverStatusNotification": true },
    })
}

pub struct Client {
    pub child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<Value>,
    /// Messages received while waiting for something else.
    pub backlog: Vec<Value>,
    next_id: i64,
    pub dir: tempfile::TempDir,
}

impl Client {
    /// Starts the bridge with the fake engine in `mode`; the fake's counters go to `stats.json`.
    pub fn spawn(mode: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = dir.path().join("stats.json");
        Self::spawn_in(
            dir,
            &[
                ("LAPCE_AI_FAKE_ENGINE", mode.into()),
                ("LAPCE_AI_FAKE_STATS", stats.into_os_string()),
            ],
        )
    }

    /// Starts the bridge in `dir` with extra environment (e.g. a real engine's endpoint settings).
    pub fn spawn_in(dir: tempfile::TempDir, envs: &[(&str, std::ffi::OsString)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lapce-ai-lsp"))
            .envs(envs.iter().map(|(k, v)| (*k, v)))
            .env("LAPCE_AI_LOG", "debug")
            .env("LAPCE_AI_LOG_FILE", dir.path().join("bridge.log"))
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lapce-ai-lsp");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            while let Ok(Some(msg)) = lsp_server::Message::read(&mut reader) {
                let Ok(value) = serde_json::to_value(&msg) else {
                    return;
                };
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stdin,
            rx,
            backlog: Vec::new(),
            next_id: 0,
            dir,
        }
    }

    pub fn send(&mut self, mut msg: Value) {
        msg["jsonrpc"] = json!("2.0");
        let body = msg.to_string();
        let stdin = self.stdin.as_mut().expect("stdin open");
        write!(stdin, "Content-Length: {}\r\n\r\n{}", body.len(), body).expect("write");
        stdin.flush().expect("flush");
    }

    pub fn request(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({ "id": id, "method": method, "params": params }));
        id
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({ "method": method, "params": params }));
    }

    /// Next message from the server, from the backlog first.
    pub fn recv(&mut self, timeout: Duration) -> Option<Value> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits for the response to `id`, keeping everything else in the backlog.
    pub fn response(&mut self, id: i64, timeout: Duration) -> Value {
        if let Some(i) = self.backlog.iter().position(|m| is_response_to(m, id)) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no response to {id} within {timeout:?}"));
            if is_response_to(&msg, id) {
                return msg;
            }
            self.backlog.push(msg);
        }
    }

    /// Drains what arrives within `wait` into the backlog and returns the notifications of `method`.
    pub fn notifications(&mut self, method: &str, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        while let Ok(m) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.backlog.push(m);
        }
        self.backlog
            .iter()
            .filter(|m| m.get("method").and_then(Value::as_str) == Some(method))
            .cloned()
            .collect()
    }

    /// `initialize` (as Lapce sends it) + `initialized`; returns the initialize result.
    pub fn initialize(&mut self, options: Option<Value>) -> Value {
        let root = format!("file://{}/", self.dir.path().display());
        let mut params = json!({
            "processId": std::process::id(),
            "rootUri": root,
            "capabilities": lapce_client_capabilities(),
            "workspaceFolders": [{ "uri": root, "name": root }],
        });
        if let Some(options) = options {
            params["initializationOptions"] = options;
        }
        let id = self.request("initialize", params);
        let resp = self.response(id, Duration::from_secs(10));
        self.notify("initialized", json!({}));
        resp["result"].clone()
    }

    pub fn uri(&self, name: &str) -> String {
        format!("file://{}/{name}", self.dir.path().display())
    }

    pub fn open(&mut self, uri: &str, language: &str, text: &str) {
        self.notify(
            "textDocument/didOpen",
            json!({ "textDocument": { "uri": uri, "languageId": language, "version": 0, "text": text } }),
        );
    }

    /// Incremental change replacing `[start, end)` (line, UTF-16 column) with `text`.
    pub fn change(
        &mut self,
        uri: &str,
        version: i32,
        start: (u32, u32),
        end: (u32, u32),
        text: &str,
    ) {
        self.notify(
            "textDocument/didChange",
            json!({
                "textDocument": { "uri": uri, "version": version },
                "contentChanges": [{
                    "range": { "start": { "line": start.0, "character": start.1 },
                               "end": { "line": end.0, "character": end.1 } },
                    "text": text,
                }],
            }),
        );
    }

    /// `textDocument/inlineCompletion` at (line, UTF-16 column); `trigger` 2 = typing, 1 = invoked.
    pub fn inline(&mut self, uri: &str, pos: (u32, u32), trigger: u8) -> i64 {
        self.request(
            "textDocument/inlineCompletion",
            json!({
                "textDocument": { "uri": uri },
                "position": { "line": pos.0, "character": pos.1 },
                "context": { "triggerKind": trigger },
            }),
        )
    }

    /// The fake engine's counters.
    pub fn stats(&self) -> Value {
        let path = self.dir.path().join("stats.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|_| "{}".into());
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn stats_path(&self) -> PathBuf {
        self.dir.path().join("stats.json")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn is_response_to(msg: &Value, id: i64) -> bool {
    msg.get("method").is_none() && msg.get("id").and_then(Value::as_i64) == Some(id)
}

/// The `insertText`s of a successful inline completion response.
pub fn items(resp: &Value) -> Vec<String> {
    let result = &resp["result"];
    let list = result.get("items").unwrap_or(result);
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["insertText"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn is_error(resp: &Value) -> bool {
    resp.get("error").is_some()
}
