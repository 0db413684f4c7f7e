//! A wasmtime host that runs a volt the way Lapce's plugin host does (WASI preview1, `lapce` imports).

use std::{
    collections::VecDeque,
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use wasi_common::pipe::{ReadPipe, WritePipe};
use wasmtime::{Engine, Linker, Module, Store, TypedFunc};
use wasmtime_wasi::{ambient_authority, Dir, WasiCtx, WasiCtxBuilder};
mod http;

/// A byte queue shared between the host and one of the volt's standard streams, like Lapce's `WasiPipe`:
/// reads drain what was written so far (an empty read means "nothing yet", not end of file).
#[derive(Default)]
struct Pipe {
    buffer: VecDeque<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.buffer.len());
        for (slot, byte) in buf.iter_mut().zip(self.buffer.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Pipe {
    fn seek(&mut self, _pos: std::io::SeekFrom) -> std::io::Result<u64> {
        Err(std::io::Error::other("can not seek in a pipe"))
    }
}

type SharedPipe = Arc<RwLock<Pipe>>;

/// Everything buffered in `pipe`, taken out (Lapce's `wasi_read_string`).
fn drain(pipe: &SharedPipe) -> Result<String> {
    let mut text = String::new();
    pipe.write()
        .map_err(|_| anyhow!("pipe lock poisoned"))?
        .read_to_string(&mut text)?;
    Ok(text)
}

fn push(pipe: &SharedPipe, text: &str) {
    if let Ok(mut pipe) = pipe.write() {
        pipe.buffer.extend(text.as_bytes());
    }
}

/// What the volt handed to the host.
#[derive(Default)]
struct Seen {
    /// Messages the volt handed over with `host_handle_rpc`, in order; a call whose output was not exactly
    /// one JSON-RPC message is recorded as a string describing it (Lapce drops such output).
    received: Vec<Value>,
    /// Lines forwarded with `host_handle_stderr`.
    stderr_lines: Vec<String>,
    /// Warnings Lapce itself would log about the volt's messages.
    lapce_warnings: Vec<String>,
}

struct HostState {
    wasi: WasiCtx,
    http: http::HttpHost,
}

/// One `host_handle_rpc` call's output as Lapce's host reads it: the whole text parsed as ONE JSON-RPC
/// message (`jsonrpc_lite::JsonRpc::parse`, i.e. `serde_json::from_str`, which allows surrounding
/// whitespace but not a second message).
fn parse_one_message(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        // jsonrpc_lite needs a string `jsonrpc` and a `method`, `result` or `error`.
        Ok(msg)
            if msg.get("jsonrpc").is_some_and(Value::is_string)
                && ["method", "result", "error"]
                    .iter()
                    .any(|k| msg.get(k).is_some()) =>
        {
            msg
        }
        Ok(msg) => Value::String(format!("not a JSON-RPC message: {msg}")),
        Err(err) => Value::String(format!("unparsable output {text:?}: {err}")),
    }
}

/// A loaded volt.
pub struct VoltHost {
    store: Store<HostState>,
    handle_rpc: TypedFunc<(), ()>,
    stdin: SharedPipe,
    seen: Arc<Mutex<Seen>>,
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
    /// Loads the volt in `volt_dir` as Lapce 0.4.6's `start_volt` does: reads `volt.toml`, compiles its
    /// `wasm`, inherits the environment and adds `VOLT_*`, preopens the folder at `/`, links WASI, the
    /// `lapce` imports and the HTTP functions, then `Linker::module` followed by `instantiate` (so the
    /// instance that gets `handle_rpc` calls never ran `_initialize` or `_start`).
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
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::add_to_linker(&mut linker, |s: &mut HostState| &mut s.wasi)?;
        http::add_to_linker(&mut linker, |s| &mut s.http)?;

        let volt_uri = dir_uri(volt_dir);
        let libc = if cfg!(target_env = "musl") {
            "musl"
        } else if cfg!(target_os = "linux") {
            "glibc"
        } else {
            ""
        };
        let stdin = SharedPipe::default();
        let stdout = SharedPipe::default();
        let stderr = SharedPipe::default();
        let wasi = WasiCtxBuilder::new()
            .inherit_env()?
            .env("VOLT_OS", std::env::consts::OS)?
            .env("VOLT_ARCH", std::env::consts::ARCH)?
            .env("VOLT_LIBC", libc)?
            .env("VOLT_URI", &volt_uri)?
            .stdin(Box::new(ReadPipe::from_shared(Arc::clone(&stdin))))
            .stdout(Box::new(WritePipe::from_shared(Arc::clone(&stdout))))
            .stderr(Box::new(WritePipe::from_shared(Arc::clone(&stderr))))
            .preopened_dir(Dir::open_ambient_dir(volt_dir, ambient_authority())?, "/")?
            .build();
        let mut store = Store::new(
            &engine,
            HostState {
                wasi,
                http: http::HttpHost::default(),
            },
        );

        let seen = Arc::new(Mutex::new(Seen::default()));
        let (rpc_seen, rpc_stdin) = (Arc::clone(&seen), Arc::clone(&stdin));
        linker.func_wrap("lapce", "host_handle_rpc", move || {
            // Like Lapce: everything printed since the last call is ONE message; a request gets its
            // reply line on stdin before the call returns.
            let Ok(text) = drain(&stdout) else { return };
            let msg = parse_one_message(&text);
            if let (Some(_), Some(id)) = (msg.get("method"), msg.get("id")) {
                let reply = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": null});
                push(&rpc_stdin, &format!("{reply}\n"));
            }
            if let Ok(mut seen) = rpc_seen.lock() {
                // psp.rs `handle_notification`: the notification form still starts the server.
                if msg.get("id").is_none() && msg["method"] == "host/startLspServer" {
                    seen.lapce_warnings
                        .push("Usage of startLspServer as a notification is deprecated.".into());
                }
                seen.received.push(msg);
            }
        })?;
        let stderr_seen = Arc::clone(&seen);
        linker.func_wrap("lapce", "host_handle_stderr", move || {
            let Ok(text) = drain(&stderr) else { return };
            if let Ok(mut seen) = stderr_seen.lock() {
                seen.stderr_lines.extend(text.lines().map(str::to_owned));
            }
        })?;
        // Lapce links the module under the name "" first (for a reactor this runs `_initialize` in a
        // throwaway instance), then instantiates it again: `handle_rpc` runs on the second instance.
        linker.module(&mut store, "", &module)?;
        let instance = linker.instantiate(&mut store, &module)?;
        let handle_rpc = instance
            .get_func(&mut store, "handle_rpc")
            .ok_or_else(|| anyhow!("the volt exports no handle_rpc()"))?
            .typed::<(), ()>(&store)?;
        Ok(Self {
            store,
            handle_rpc,
            stdin,
            seen,
            volt_dir: volt_dir.to_path_buf(),
            volt_uri,
        })
    }

    /// Sends one JSON-RPC message (written to stdin with a newline, then `handle_rpc()`), returning what
    /// the volt sent to the host during the call; an error if any `host_handle_rpc` call carried output
    /// Lapce could not parse as exactly one message.
    pub fn send(&mut self, msg: &Value) -> Result<Vec<Value>> {
        push(&self.stdin, &format!("{msg}\n"));
        let before = self.seen().received.len();
        self.handle_rpc.call(&mut self.store, ())?;
        let sent = self.seen().received[before..].to_vec();
        // Lapce drops output that is not one JSON-RPC message per call: fail loudly instead.
        if let Some(dropped) = sent.iter().find(|m| m.is_string()) {
            return Err(anyhow!("Lapce would drop this volt output: {dropped}"));
        }
        Ok(sent)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// URLs the volt fetched through the HTTP host functions, in order.
    pub fn http_requests(&self) -> &[String] {
        &self.store.data().http.requested
    }

    /// What the volt forwarded to Lapce's log.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.seen().stderr_lines.clone()
    }

    /// Warnings Lapce 0.4.6 logs about what the volt sent.
    pub fn lapce_warnings(&self) -> Vec<String> {
        self.seen().lapce_warnings.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_is_one_message() {
        let one = parse_one_message("{\"jsonrpc\":\"2.0\",\"method\":\"a\"}\n");
        assert_eq!(one["method"], "a");
        let two = parse_one_message(
            "{\"jsonrpc\":\"2.0\",\"method\":\"a\"}\n{\"jsonrpc\":\"2.0\",\"method\":\"b\"}\n",
        );
        assert!(
            two.is_string(),
            "two messages in one call are refused: {two}"
        );
        assert!(parse_one_message("").is_string());
        assert!(parse_one_message("{\"method\":\"a\"}").is_string());
    }
}
