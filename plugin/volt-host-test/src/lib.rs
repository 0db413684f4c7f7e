//! A wasmtime host that runs a volt the way Lapce's plugin host does (WASI preview1, `lapce` imports).

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use serde_json::Value;
use wasmtime::{Caller, Engine, Linker, Module, Store, TypedFunc};
mod http;

use wasmtime_wasi::{
    async_trait,
    cli::{IsTerminal, StdinStream},
    p2::{pipe::MemoryOutputPipe, InputStream, Pollable, StreamError},
    preview1::WasiP1Ctx,
    DirPerms, FilePerms, WasiCtxBuilder,
};

/// The volt's stdin: the host appends one message per `handle_rpc` call.
#[derive(Clone, Default)]
struct SharedInput(Arc<Mutex<Vec<u8>>>);

impl SharedInput {
    fn push(&self, bytes: &[u8]) {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(bytes);
        }
    }

    fn take(&self, max: usize) -> Vec<u8> {
        match self.0.lock() {
            Ok(mut b) => {
                let n = max.min(b.len());
                b.drain(..n).collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

#[async_trait]
impl InputStream for SharedInput {
    fn read(&mut self, size: usize) -> Result<Bytes, StreamError> {
        // Empty means "nothing yet" (the guest reads only after the host wrote).
        Ok(Bytes::from(self.take(size)))
    }
}

#[async_trait]
impl Pollable for SharedInput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncRead for SharedInput {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let bytes = self.take(buf.remaining());
        buf.put_slice(&bytes);
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for SharedInput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for SharedInput {
    fn p2_stream(&self) -> Box<dyn InputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }
}

struct HostState {
    wasi: WasiP1Ctx,
    stdin: SharedInput,
    stdout: MemoryOutputPipe,
    stdout_seen: usize,
    stderr: MemoryOutputPipe,
    stderr_seen: usize,
    /// Messages the volt handed over with `host_handle_rpc`, in order.
    received: Vec<Value>,
    /// Lines forwarded with `host_handle_stderr`.
    stderr_lines: Vec<String>,
    http: http::HttpHost,
}

fn new_text(pipe: &MemoryOutputPipe, seen: &mut usize) -> String {
    let all = pipe.contents();
    let start = (*seen).min(all.len());
    *seen = all.len();
    String::from_utf8_lossy(&all[start..]).into_owned()
}

/// A loaded volt.
pub struct VoltHost {
    store: Store<HostState>,
    handle_rpc: TypedFunc<(), ()>,
    pub volt_dir: PathBuf,
    pub volt_uri: String,
}

/// `file://` URL of a folder, with the trailing `/` Lapce gives `VOLT_URI`.
pub fn dir_uri(dir: &Path) -> String {
    let s = dir.display().to_string();
    let s = s.trim_end_matches('/');
    format!("file://{s}/")
}

impl VoltHost {
    /// Loads the volt in `volt_dir`: reads `volt.toml`, compiles its `wasm`, preopens the folder at
    /// `/`, sets `VOLT_*` and links the `lapce` imports.
    pub fn load(volt_dir: &Path) -> Result<Self> {
        let manifest = std::fs::read_to_string(volt_dir.join("volt.toml"))
            .with_context(|| format!("reading volt.toml in {}", volt_dir.display()))?;
        let manifest: toml::Value = toml::from_str(&manifest).context("parsing volt.toml")?;
        let wasm = manifest
            .get("wasm")
            .and_then(toml::Value::as_str)
            .ok_or_else(|| anyhow!("volt.toml has no wasm"))?;
        let wasm_path = volt_dir.join(wasm);
        let engine = Engine::default();
        let module = Module::from_file(&engine, &wasm_path)
            .with_context(|| format!("compiling {}", wasm_path.display()))?;

        let volt_uri = dir_uri(volt_dir);
        let stdin = SharedInput::default();
        let stdout = MemoryOutputPipe::new(usize::MAX / 2);
        let stderr = MemoryOutputPipe::new(usize::MAX / 2);
        let libc = if cfg!(target_env = "musl") {
            "musl"
        } else if cfg!(target_os = "linux") {
            "glibc"
        } else {
            ""
        };
        let wasi = WasiCtxBuilder::new()
            .stdin(stdin.clone())
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .env("VOLT_URI", &volt_uri)
            .env("VOLT_OS", std::env::consts::OS)
            .env("VOLT_ARCH", std::env::consts::ARCH)
            .env("VOLT_LIBC", libc)
            .preopened_dir(volt_dir, "/", DirPerms::all(), FilePerms::all())?
            .build_p1();
        let state = HostState {
            wasi,
            stdin,
            stdout,
            stdout_seen: 0,
            stderr,
            stderr_seen: 0,
            received: Vec::new(),
            stderr_lines: Vec::new(),
            http: http::HttpHost::default(),
        };
        let mut store = Store::new(&engine, state);
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::preview1::add_to_linker_sync(&mut linker, |s| &mut s.wasi)?;
        linker.func_wrap(
            "lapce",
            "host_handle_rpc",
            |mut caller: Caller<'_, HostState>| {
                let state = caller.data_mut();
                // Like Lapce: everything printed since the last call is parsed as ONE message; text that
                // is not exactly one JSON value (two messages, a partial line) is dropped by Lapce and
                // recorded here as a string so tests can flag it.
                let text = new_text(&state.stdout, &mut state.stdout_seen);
                let msg: Value = match serde_json::from_str(text.trim()) {
                    Ok(v) => v,
                    Err(err) => Value::String(format!("unparsable output {text:?}: {err}")),
                };
                // A request from the volt gets an (empty) answer on its stdin, like Lapce's.
                if msg.get("method").is_some() {
                    if let Some(id) = msg.get("id") {
                        let reply = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": null});
                        state.stdin.push(format!("{reply}\n").as_bytes());
                    }
                }
                state.received.push(msg);
            },
        )?;
        linker.func_wrap(
            "lapce",
            "host_handle_stderr",
            |mut caller: Caller<'_, HostState>| {
                let state = caller.data_mut();
                let text = new_text(&state.stderr, &mut state.stderr_seen);
                state.stderr_lines.extend(text.lines().map(str::to_owned));
            },
        )?;
        http::add_to_linker(&mut linker, |s| &mut s.http)?;
        // Lapce instantiates the module and calls `handle_rpc` directly: no `_initialize`, no `_start`.
        let instance = linker.instantiate(&mut store, &module)?;
        let handle_rpc = instance
            .get_typed_func::<(), ()>(&mut store, "handle_rpc")
            .context("the volt exports no handle_rpc()")?;
        Ok(Self {
            store,
            handle_rpc,
            volt_dir: volt_dir.to_path_buf(),
            volt_uri,
        })
    }

    /// Sends one JSON-RPC message (written to stdin, then `handle_rpc()`), returning what the volt
    /// sent to the host during the call.
    pub fn send(&mut self, msg: &Value) -> Result<Vec<Value>> {
        let line = format!("{msg}\n");
        self.store.data().stdin.push(line.as_bytes());
        let before = self.store.data().received.len();
        self.handle_rpc.call(&mut self.store, ())?;
        Ok(self.store.data().received[before..].to_vec())
    }

    /// URLs the volt fetched through the HTTP host functions, in order.
    pub fn http_requests(&self) -> &[String] {
        &self.store.data().http.requested
    }

    /// What the volt forwarded to Lapce's log.
    pub fn stderr_lines(&self) -> &[String] {
        &self.store.data().stderr_lines
    }
}
