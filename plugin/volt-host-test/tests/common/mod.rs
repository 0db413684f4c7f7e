//! Helpers shared by the volt host tests: building the wasm, volt folders, Lapce's messages.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard},
};

use serde_json::{json, Value};

/// Serialises the cargo invocations of these tests (builds with different baked settings share one
/// output file).
static CARGO: Mutex<()> = Mutex::new(());

pub fn cargo_lock() -> MutexGuard<'static, ()> {
    CARGO.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => workspace_root().join(t),
        None => workspace_root().join("target"),
    }
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir());
    c
}

/// Runs `cargo xtask --profile <profile> <args>` (serialised with the other cargo runs) and returns its
/// stdout; fails the test with both outputs when it fails.
pub fn xtask(profile: &str, args: &[&std::ffi::OsStr]) -> String {
    let _lock = cargo_lock();
    let out = cargo()
        .args(["run", "--quiet", "-p", "xtask", "--", "--profile", profile])
        .args(args)
        .output()
        .expect("run xtask");
    assert!(
        out.status.success(),
        "xtask {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the wasm volt (release, wasm32-wasip1) with the given baked release URL and archive hashes and
/// returns its bytes (read before another test can rebuild it differently).
pub fn built_wasm(release_url: &str, hashes: &str) -> Vec<u8> {
    let _lock = cargo_lock();
    let status = cargo()
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip1",
            "-p",
            "lapce-ai-volt",
        ])
        .env("LAPCE_AI_RELEASE_URL", release_url)
        .env("LAPCE_AI_ARCHIVE_SHA256", hashes)
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building the volt failed (needs `rustup target add wasm32-wasip1`)"
    );
    std::fs::read(target_dir().join("wasm32-wasip1/release/lapce_ai_volt.wasm")).expect("wasm")
}

pub fn platform_name(name: &str) -> String {
    format!(
        "{name}-{}-{}{}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        std::env::consts::EXE_SUFFIX
    )
}

pub fn bridge_name() -> String {
    platform_name("lapce-ai-lsp")
}

pub fn engine_name() -> String {
    platform_name("ai-engine")
}

/// A stand-in executable for this machine (only its header is looked at): ELF with this CPU's machine.
pub fn fake_executable() -> Vec<u8> {
    let machine: u16 = if std::env::consts::ARCH == "aarch64" {
        183
    } else {
        62
    };
    let mut head = b"\x7fELF\x02\x01\x01".to_vec();
    head.resize(18, 0);
    head.extend_from_slice(&machine.to_le_bytes());
    head.resize(64, 0);
    head
}

/// A volt folder with volt.toml, icon, the (development) wasm and the given `bin/` files.
pub fn volt_dir(bin: &[(String, Vec<u8>)]) -> tempfile::TempDir {
    let wasm = built_wasm("", "");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = workspace_root();
    std::fs::copy(root.join("volt.toml"), dir.path().join("volt.toml")).expect("volt.toml");
    std::fs::copy(root.join("icon.svg"), dir.path().join("icon.svg")).expect("icon");
    std::fs::write(dir.path().join("lapce-ai.wasm"), wasm).expect("wasm");
    if !bin.is_empty() {
        std::fs::create_dir_all(dir.path().join("bin")).expect("bin");
    }
    for (name, bytes) in bin {
        std::fs::write(dir.path().join("bin").join(name), bytes).expect("bin file");
    }
    dir
}

/// `initialize` exactly as Lapce sends it to a volt (id 0).
pub fn initialize(options: Option<Value>) -> Value {
    let mut params = json!({
        "processId": 4242,
        "rootUri": "file:///home/user/project/",
        "capabilities": { "textDocument": { "inlineCompletion": {} } },
        "workspaceFolders": [{ "uri": "file:///home/user/project/", "name": "file:///home/user/project/" }],
    });
    if let Some(o) = options {
        params["initializationOptions"] = o;
    }
    json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params })
}

/// The volt's defaults (`volt.toml` `[config]`).
pub fn defaults() -> Value {
    json!({
        "enabled": true,
        "profile": "",
        "debounce-ms": 150,
        "max-lines": 8,
        "endpoint": "default",
        "engine-path": "",
        "multiline": "auto",
        "download-url": "",
    })
}

pub fn by_method<'a>(msgs: &'a [Value], method: &str) -> Vec<&'a Value> {
    msgs.iter()
        .filter(|m| m.get("method").and_then(Value::as_str) == Some(method))
        .collect()
}

/// Every `host_handle_rpc` call carried exactly one JSON message (Lapce drops anything else).
pub fn assert_one_message_per_call(msgs: &[Value]) {
    for m in msgs {
        assert!(m.is_object(), "Lapce would drop this output: {m}");
    }
}

pub fn start_request(msgs: &[Value]) -> Value {
    let starts = by_method(msgs, "host/startLspServer");
    assert_eq!(starts.len(), 1, "exactly one start request: {msgs:#?}");
    starts[0]["params"].clone()
}

/// The one `window/showMessage` (type, text).
pub fn one_message(msgs: &[Value]) -> (i64, String) {
    let shown = by_method(msgs, "window/showMessage");
    assert_eq!(shown.len(), 1, "exactly one message: {msgs:#?}");
    (
        shown[0]["params"]["type"].as_i64().unwrap_or_default(),
        shown[0]["params"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}
